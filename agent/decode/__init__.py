"""Decoders: raw frames and lines in, samples and events out. Pure: no I/O, clock = the data's timestamps."""
