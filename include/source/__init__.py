"""Where adapters come from: local dirs and SSH boxes (Vast.ai instances), transfers, the download stage."""
