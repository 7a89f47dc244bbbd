"""Backup-storage agent: stores images in a directory and reports to the image service."""
