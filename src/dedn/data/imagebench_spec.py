"""The built-in image benchmark's specification: parts, palette, patterns, habitats, attribute groups and
its config."""

from __future__ import annotations

from dataclasses import dataclass

from dedn.errors import ConfigError

#: Creature parts, in mask order.
PART_NAMES: tuple[str, ...] = ("head", "body", "wings", "tail", "legs")


#: Named colours available to colour groups; ``ImageBenchConfig.n_colors`` takes the first n.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 40),
    "green": (45, 165, 60),
    "blue": (40, 80, 215),
    "purple": (135, 50, 175),
    "black": (28, 28, 28),
    "white": (240, 240, 240),
    "brown": (125, 75, 35),
    "pink": (250, 150, 190),
}


PATTERNS = ("solid", "striped", "spotted")


HABITATS = ("water", "grass", "sky", "sand", "forest")


def group_definitions(n_colors: int) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """(group name, part name or None for global, values) for every attribute group, in attribute order."""
    colors = tuple(PALETTE)[:n_colors]
    return [
        ("head_color", "head", colors),
        ("head_shape", "head", ("round", "pointed", "square", "crested")),
        ("body_color", "body", colors),
        ("body_pattern", "body", PATTERNS),
        ("wing_color", "wings", colors),
        ("wing_pattern", "wings", PATTERNS),
        ("wing_shape", "wings", ("rounded", "pointed")),
        ("tail_color", "tail", colors),
        ("tail_shape", "tail", ("fan", "straight", "forked")),
        ("leg_color", "legs", colors),
        ("leg_length", "legs", ("short", "long")),
        ("size", None, ("small", "medium", "large")),
        ("body_shape", None, ("round", "elongated")),
        ("habitat", None, HABITATS),
    ]


@dataclass
class ImageBenchConfig:
    """Size, split and difficulty of the rendered image benchmark.

    The defaults give 40 classes (30 seen, 10 unseen) x 60 images = 2400 images at 224 px. The
    difficulty knobs are grouped below; raising any of them makes the task harder.
    """

    seed: int = 0
    n_classes: int = 40
    n_unseen: int = 10
    n_val: int = 8  # validation classes, a subset of the seen classes (like xlsa17 valclasses1)
    images_per_class: int = 60
    image_size: int = 224
    test_seen_fraction: float = 0.2  # share of each seen class's images held out as test_seen
    n_colors: int = 8  # values of each colour group (at most len(PALETTE))

    # class structure: classes are families of close relatives
    family_size: int = 4  # classes per family (share a base attribute combination)
    family_mutations: int = 2  # changes made to the family's base for each class
    p_color_swap: float = 0.6  # chance that a change swaps two parts' colours (same colours, other parts)
    min_class_distance: int = 2  # dominant values of any two classes differ in at least this many groups
    p_secondary: float = 0.3  # chance that a class's group has a second value
    secondary_weight: tuple[float, float] = (0.15, 0.4)  # probability range of that second value

    # image jitter
    pose_jitter_deg: float = 15.0  # std of the body rotation; wing / tail / leg angles jitter too
    scale_jitter: float = 0.08  # relative std of the creature scale within a size value
    position_jitter: float = 0.8  # 0: centred; 1: anywhere the creature fits in the frame
    color_jitter: float = 18.0  # std of per-part RGB jitter (0..255 units)
    lighting_jitter: float = 0.15  # global brightness factor drawn from 1 +- this
    clutter: float = 2.0  # mean number of distractor blobs (palette colours) in the background
    occlusion_prob: float = 0.15  # chance of a foreground occluder overlapping the creature
    noise: float = 6.0  # std of Gaussian pixel noise (0..255 units)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for inconsistent settings."""
        if self.seed < 0:
            raise ConfigError(f"imagebench.seed must be non-negative, got {self.seed}")
        if self.n_classes < 2:
            raise ConfigError(f"imagebench.n_classes must be at least 2, got {self.n_classes}")
        if not 1 <= self.n_unseen < self.n_classes:
            raise ConfigError(f"imagebench.n_unseen must be in 1..{self.n_classes - 1}, got {self.n_unseen}")
        if not 0 <= self.n_val < self.n_classes - self.n_unseen:
            raise ConfigError(f"imagebench.n_val must be in 0..{self.n_classes - self.n_unseen - 1} (fewer "
                              f"than the seen classes), got {self.n_val}")
        if self.images_per_class < 2:
            raise ConfigError(f"imagebench.images_per_class must be at least 2, got {self.images_per_class}")
        if self.image_size < 32:
            raise ConfigError(f"imagebench.image_size must be at least 32, got {self.image_size}")
        if not 0.0 < self.test_seen_fraction < 1.0:
            raise ConfigError(f"imagebench.test_seen_fraction must be in (0, 1), got "
                              f"{self.test_seen_fraction}")
        if not 2 <= self.n_colors <= len(PALETTE):
            raise ConfigError(f"imagebench.n_colors must be in 2..{len(PALETTE)}, got {self.n_colors}")
        if self.family_size < 1 or self.family_mutations < 0:
            raise ConfigError("imagebench.family_size must be >= 1 and family_mutations >= 0")
        if not 0.0 <= self.p_color_swap <= 1.0:
            raise ConfigError(f"imagebench.p_color_swap must be in [0, 1], got {self.p_color_swap}")
        if not 0.0 <= self.p_secondary <= 1.0:
            raise ConfigError(f"imagebench.p_secondary must be in [0, 1], got {self.p_secondary}")
        lo, hi = self.secondary_weight
        if not 0.0 <= lo <= hi < 1.0:
            raise ConfigError(f"imagebench.secondary_weight must satisfy 0 <= low <= high < 1, got "
                              f"{self.secondary_weight}")
        if not 0.0 <= self.position_jitter <= 1.0:
            raise ConfigError(f"imagebench.position_jitter must be in [0, 1], got {self.position_jitter}")
        if not 0.0 <= self.occlusion_prob <= 1.0:
            raise ConfigError(f"imagebench.occlusion_prob must be in [0, 1], got {self.occlusion_prob}")
        knobs = ("pose_jitter_deg", "scale_jitter", "color_jitter", "lighting_jitter", "clutter", "noise")
        for name in knobs:
            if getattr(self, name) < 0:
                raise ConfigError(f"imagebench.{name} must be non-negative, got {getattr(self, name)}")
