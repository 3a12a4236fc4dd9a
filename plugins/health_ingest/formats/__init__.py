"""Readers that stream records out of delivered files, never holding a whole file in memory."""
