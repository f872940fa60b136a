"""The notifiers: one small protocol, one module per provider."""
