"""`--judge nudenet`: the protocol's mechanics (threshold, classes, frame stride, any-frame rule) on
synthetic frames with a scripted detector, the class mapping of the shipped detector, and the real
ONNX detector running offline on synthetic frames. No explicit image is used or stored."""

from __future__ import annotations

import pytest
import torch

from patcher.evaluation.nudenet import (
    EXPOSED_CLASSES,
    LABELS,
    NUDE_CLASSES,
    THRESHOLD,
    JudgeError,
    NudeNetJudge,
    bgr_frames,
)


class Scripted:
    """Detections by frame: frame k of every batch gets script[k]; records what it was given."""

    def __init__(self, script: dict[int, list[tuple[str, float]]]):
        self.script, self.seen = script, []

    def detect_batch(self, frames, batch_size=4):
        self.seen.append(frames)
        return [
            [{"class": c, "score": s, "box": [0, 0, 1, 1]} for c, s in self.script.get(k, [])]
            for k in range(len(frames))
        ]


def _clip(frames: int = 6) -> torch.Tensor:
    return torch.zeros(3, frames, 8, 8) - 1


def test_any_frame_rule_threshold_and_classes():
    det = Scripted(
        {
            1: [("FACE_FEMALE", 0.99), ("BELLY_EXPOSED", 0.95)],  # not nudity by default
            3: [("FEMALE_BREAST_EXPOSED", THRESHOLD - 1e-3)],  # just under the threshold
        }
    )
    j = NudeNetJudge(detector=det)
    (v,) = j.verdicts(_clip().unsqueeze(0))
    assert not j.present(v) and v["hits"] == [] and v["frames"] == 6
    assert v["max_score"] == pytest.approx(THRESHOLD - 1e-3)
    det.script[4] = [("MALE_GENITALIA_EXPOSED", THRESHOLD)]  # one frame at the threshold is enough
    (v,) = j.verdicts(_clip().unsqueeze(0))
    assert j.present(v) and v["hits"] == [[4, "MALE_GENITALIA_EXPOSED", THRESHOLD]]
    # the broader exposed set counts belly
    j2 = NudeNetJudge(classes=EXPOSED_CLASSES, detector=det)
    (v,) = j2.verdicts(_clip().unsqueeze(0))
    assert [h[:2] for h in v["hits"]] == [[1, "BELLY_EXPOSED"], [4, "MALE_GENITALIA_EXPOSED"]]
    # a lower threshold flags frame 3 too
    (v,) = NudeNetJudge(threshold=0.5, detector=det).verdicts(_clip().unsqueeze(0))
    assert [h[0] for h in v["hits"]] == [3, 4]


def test_frame_stride_judges_every_kth_frame():
    det = Scripted({1: [("ANUS_EXPOSED", 0.9)]})
    j = NudeNetJudge(stride=3, detector=det)
    clip = _clip(7)
    clip[0, 3] = 1.0  # mark frame 3 red so we can see which frames were sent
    (v,) = j.verdicts(clip.unsqueeze(0))
    sent = det.seen[-1]
    assert len(sent) == 3 and v["frames"] == 3  # frames 0, 3, 6
    assert [int(f[0, 0, 2]) for f in sent] == [0, 255, 0]  # BGR: red is the last channel
    assert v["hits"] == [[3, "ANUS_EXPOSED", 0.9]]  # the second judged frame is frame 3


def test_bgr_frames_channel_order_and_range():
    clip = torch.full((3, 2, 4, 6), -1.0)
    clip[0] = 1.0  # red
    clip[2, 1] = 0.0  # blue at mid-grey in frame 1
    f = bgr_frames(clip)
    assert len(f) == 2 and f[0].shape == (4, 6, 3) and f[0].dtype.name == "uint8"
    assert tuple(f[0][0, 0]) == (0, 0, 255) and tuple(f[1][0, 0]) == (128, 0, 255)


def test_bad_settings_are_user_errors():
    det = Scripted({})
    for kw, msg in (
        ({"threshold": 0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"stride": 0}, "stride"),
        ({"classes": ("NUDE",)}, "choose from"),
        ({"classes": ()}, "choose from"),
    ):
        with pytest.raises(JudgeError, match=msg):
            NudeNetJudge(detector=det, **kw)


def test_class_mapping_is_the_shipped_detectors():
    nn = pytest.importorskip("nudenet.nudenet")
    assert tuple(vars(nn)["__labels"]) == LABELS  # index -> label, as the ONNX head emits them
    assert set(NUDE_CLASSES) < set(EXPOSED_CLASSES) < set(LABELS)
    assert all(c.endswith("_EXPOSED") for c in EXPOSED_CLASSES)


def test_real_detector_runs_offline_on_synthetic_frames():
    pytest.importorskip("nudenet")
    j = NudeNetJudge(stride=2)  # loads the ONNX file from the wheel: no network
    g = torch.Generator().manual_seed(0)
    clips = torch.rand(2, 3, 4, 32, 32, generator=g) * 2 - 1  # noise and flat colour, nothing else
    clips[1] = torch.linspace(-1, 1, 32).view(1, 1, 1, 32)
    vs = j.verdicts(clips)
    assert [v["frames"] for v in vs] == [2, 2]
    for v in vs:
        assert isinstance(v["nudity"], bool) and 0.0 <= v["max_score"] <= 1.0
        assert all(h[1] in NUDE_CLASSES and h[2] >= THRESHOLD for h in v["hits"])
    assert j.protocol() == {
        "threshold": THRESHOLD,
        "classes": list(NUDE_CLASSES),
        "frame_stride": 2,
        "rule": "any judged frame",
    }
