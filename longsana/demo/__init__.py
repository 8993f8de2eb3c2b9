"""The built-in demo: a small model of the LongSANA architecture trained on procedural clips (`clips`), so that
a fresh machine with no downloaded weights streams a video that follows its prompt."""
