"""Constants of the model's input convention, shared by the model and the data path."""

# Video frames enter the model as RGB in [0, 1], normalised per channel with ImageNet's mean and std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
