"""The Ray Train job that trains Imagine's models."""
