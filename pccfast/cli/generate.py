from pccfast.runs.generate import build_parser, main  # noqa: F401
