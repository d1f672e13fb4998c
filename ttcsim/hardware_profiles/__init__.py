"""Hardware profiles shipped as YAML package data, one file per device."""
