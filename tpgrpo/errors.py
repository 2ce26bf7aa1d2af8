"""Errors a user can fix. Each message is one line naming the file or field and what was expected;
the ``tpgrpo`` command prints it and exits with status 2. Kept free of heavy imports so the
command line can catch them without loading torch or diffusers."""


class UserError(Exception):
    """A problem with the user's input, configuration or files."""


class ConfigError(UserError, ValueError):
    """An invalid configuration (params.yaml, a variant or an override)."""


class PromptFileError(UserError, ValueError):
    """A prompt file is missing, empty or has a malformed line."""


class ModelLoadError(UserError, RuntimeError):
    """A pipeline directory is missing, incomplete or unreadable."""


class UnknownRewardError(UserError, ValueError):
    """A reward name that is not registered."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or was written by a different number of processes."""


class RewardError(UserError, RuntimeError):
    """The reward function raised while scoring rollouts (a broken scorer, an unreachable reward
    server); the run stops, its checkpoints intact, and resumes when started again."""


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking store cannot be created or written."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on as configured (e.g. non-finite updates in a row); the run stops with its
    last checkpoint intact."""
