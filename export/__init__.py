"""Keras -> ONNX export, quantization and the accuracy gate. The gate's default limits live here
(light to import: the command line shows them without loading numpy)."""

MIN_AGREEMENT = 0.99  # argmax agreement of a variant with FP32, on each of val and test
MAX_ACCURACY_DROP_POINTS = 0.5  # accuracy(FP32) - accuracy(variant), percentage points
CALIB_IMAGES = 500  # training images that calibrate INT8 (200 gave 98.6 % validation agreement, 500 gave 99.6 %)
