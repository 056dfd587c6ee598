"""Lab results as they travel between labs and hospitals: CSV extracts and HL7 v2 messages
(from files, or live over MLLP)."""
