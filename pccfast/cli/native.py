from pccfast.backends.native import main  # noqa: F401
