"""Command-line tools: demo data, face crops, benchmark (importable for tests)."""
