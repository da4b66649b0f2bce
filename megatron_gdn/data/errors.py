"""The one exception type of the data pipeline.

Every problem with user input (a corpus line, a tokenizer file, a .bin/.idx pair, a --data-path list)
raises DataError with a one-line message that names the file and, where it applies, the line or
document. Command-line tools print that line and exit with status 1 instead of a traceback.
"""


class DataError(ValueError):
    """Bad input to the data pipeline; the message says what was wrong and where."""
