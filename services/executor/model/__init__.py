"""The served model families (config.ARCHS), their shared layers and the loader."""
