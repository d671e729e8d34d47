from attribution.data import toy_world
from attribution.data.dataset import CaptionedImageSet, write_world
from attribution.fidelity import train_attribute_classifier


def test_attribute_classifier_reads_real_images(tmp_path):
    """Known answer: on real toy images the classifier must be far above chance."""
    images, caps, attrs = toy_world.generate_world(600, 16, 3, 0.3, [], seed=1)
    write_world(tmp_path, images, caps, attrs, {})
    _, acc = train_attribute_classifier(CaptionedImageSet(tmp_path), steps=150, batch_size=64,
                                        seed=0)
    assert acc["colour"] >= 0.9  # chance 1/6
    assert acc["position"] >= 0.9  # chance 1/5
    assert acc["background"] >= 0.9  # chance 1/3
    assert acc["shape"] >= 0.5  # chance 1/5
