"""A procedural long-video question-answering suite (seeded, deterministic, no downloads).

Clips of coloured shapes in a 2x2 grid (56x56 px by default: one Qwen2-VL visual token per cell, 4 tokens per pair
of frames), 8 to 512 frames, each with a question and a one-word answer. Task kinds: ``global`` (counting and
ordering flashes, an object's colour when a cue appears), ``local`` (the layout in the pair of frames where a cue
appears), ``image`` (one still frame). See ``docs/SYNTHETIC.md``.

    >>> from linmu.synthetic import TASKS, generate_example, make_split, chance_levels
    >>> ex = generate_example(0, "flash_count", num_frames=32)
    >>> ex.question, ex.answer, ex.frames.shape
"""

from .suite import (DEFAULT_FRAME_SIZE, FPS, SPLIT_SEEDS, Example, generate_example, make_split, normalize_answer,
                    prompt_text, score, split_of, split_seeds, suite_info, to_loaded_sample, visual_tokens,
                    write_split)
from .tasks import SPECS, TASK_KINDS, TASKS, TaskSpec, answer_choices, chance_levels, vocabulary

__all__ = ["TASKS", "TASK_KINDS", "SPECS", "TaskSpec", "Example", "generate_example", "make_split",
           "to_loaded_sample", "vocabulary", "chance_levels", "answer_choices", "score", "normalize_answer",
           "write_split", "suite_info", "visual_tokens", "split_of", "split_seeds", "prompt_text", "SPLIT_SEEDS",
           "DEFAULT_FRAME_SIZE", "FPS"]
