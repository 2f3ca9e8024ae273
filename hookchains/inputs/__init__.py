"""What the explanation is about: models built from a spec string, image sets, the tasks of a case study,
and how a model is called and its output read (`forward`)."""
