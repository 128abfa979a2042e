"""The one exception type a user sees: its message is the single line a stage prints."""


class PipelineError(Exception):
    """A failure caused by input (parameters, files, data), reported as one clear line."""
