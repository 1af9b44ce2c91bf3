"""Data: LLaVA-style conversations, PyAV video decoding, an offline tokenizer, Qwen2-VL/Qwen2.5-VL batching without
torchvision, and a data set that skips and counts bad samples."""

from .conversations import LoadedSample, Sample, load_conversations
from .dataset import Collator, ConversationDataset, SeededSampler, SkipCounter, load_media
from .media import MediaError, decode_video, load_image, write_test_video
from .qwen_processing import BadSampleError, ProcessorOutput, QwenVLProcessor, smart_resize
from .tokenizer import build_tokenizer

__all__ = ["Sample", "LoadedSample", "load_conversations", "ConversationDataset", "SkipCounter", "Collator",
           "SeededSampler", "load_media", "MediaError", "decode_video", "load_image", "write_test_video",
           "QwenVLProcessor", "BadSampleError", "ProcessorOutput", "smart_resize", "build_tokenizer"]
