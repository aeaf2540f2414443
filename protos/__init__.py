"""The API contract (imagine.v1) and its generated code."""
