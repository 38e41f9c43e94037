"""Test doubles for Moxy's seams: production code ships none of them."""
