"""Engine profiles shipped as YAML package data, one file per engine (file name = name)."""
