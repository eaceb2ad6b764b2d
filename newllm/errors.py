"""One exception type for bad input, so the CLI can print it as one line.

Every error raised for something the *user* got wrong (a file, a flag, a token id) is a
`NewLLMError`. Its message says what is wrong and where (file, tensor, layer, position).
"""


class NewLLMError(ValueError):
    """Bad input: the message names the problem and where it is."""
