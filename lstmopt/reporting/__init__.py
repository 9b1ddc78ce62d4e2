"""What users read: the JSON and Markdown reports (``report``) and the terminal tables (``display``)."""
