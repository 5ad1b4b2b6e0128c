"""One module per tab: its handlers (plain functions, testable without a server) and its ``build``."""
