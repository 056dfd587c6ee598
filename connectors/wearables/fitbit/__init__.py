"""The Fitbit Web API: patients connected one by one over OAuth 2.0 (`oauth`), their data
pulled by date windows (`api`)."""
