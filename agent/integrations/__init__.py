"""Trainer integrations: a Lightning ``Callback`` and a Hugging Face ``TrainerCallback``."""
