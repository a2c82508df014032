"""Local stand-ins for outside services that tests drive with real client libraries."""
