"""Stage two: camera students trained from cached (or live) teacher targets with the DistillBEV objective."""
