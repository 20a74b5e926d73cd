"""Model files shipped with stepdrop (see stepdrop.checkpoint.load_pretrained)."""
