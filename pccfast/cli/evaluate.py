from pccfast.tools.evaluate import build_parser, main  # noqa: F401
