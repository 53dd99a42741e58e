from pccfast.runs.relabel import build_parser, main  # noqa: F401
