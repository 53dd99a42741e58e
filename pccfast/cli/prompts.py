from pccfast.data.prompts import build_parser, main  # noqa: F401
