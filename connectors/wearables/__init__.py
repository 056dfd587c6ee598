"""Wearable streams as samples: the Fitbit Web API, Fitabase CSV exports, Open mHealth data
points and Apple Health exports."""
