"""Respacing (Section 4 of the paper: sampling with fewer steps): which steps of a T-step
process a respaced one keeps. Pure Python, so the config checks use the same rules without
loading torch; ``unet.core.diffusion`` builds the respaced process from them."""


def space_timesteps(num_timesteps, section_counts):
    """
    The steps kept when respacing a T-step process.

    :param num_timesteps: T of the original process.
    :param section_counts: "ddimN" (a stride giving exactly N steps, as in DDIM), or
        "a,b,c" / a list: T is cut into equal sections and section i keeps ``a_i`` evenly
        spaced steps (a single "N" spaces N steps over the whole range).
    :return: a sorted list of kept step indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    if not section_counts or min(section_counts) < 1:
        raise ValueError(f"every section keeps at least one step, got {section_counts}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(steps))


def respacing_error(respacing: str, steps: int) -> "str | None":
    """Why ``respacing`` (a ``timestep_respacing`` value) cannot respace a ``steps``-step
    process, as the allowed values (None if it can): ``space_timesteps``'s verdict, worded
    for a config key."""
    if not respacing:
        return None
    try:
        space_timesteps(steps, respacing)
        return None
    except ValueError:
        pass
    if respacing.startswith("ddim"):
        return f"ddimN with N a count an integer stride gives from {steps} steps"
    parts = respacing.split(",")
    if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        return '"", "N", "a,b,c" (steps per section, each >= 1) or "ddimN"'
    return f"at most as many steps per section as the section has ({steps} steps in {len(parts)} sections)"
