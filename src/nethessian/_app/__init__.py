"""The command-line application: problem files, the HTML report, saved results. Not public API."""
