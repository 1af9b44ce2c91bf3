"""The embedded default: synthetic long-video QA world, a tiny teacher, and `linmu demo` end to end."""
