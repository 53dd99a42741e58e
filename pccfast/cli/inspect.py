from pccfast.tools.inspection import build_parser, main  # noqa: F401
