"""What the explanation is about: models built from a spec string, image sets, the tasks of a case study."""
