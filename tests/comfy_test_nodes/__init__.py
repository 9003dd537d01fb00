"""Test-only ComfyUI nodes (never registered by the pack): stand-ins for the umt5 text encoder (and a text encoder
object for nodes that take the CLIP itself), CLIP vision, the
Wan 2.2 VAE's encoder, the wav2vec2 audio encoders and SAM 3, which cannot be downloaded where the tests run, and
ComfyUI's native Cosmos Predict2 and Cosmos 1.0 models for a tiny file (which ComfyUI's own loader cannot size); and
an IMAGE saved as its float tensor."""
import math

import torch


class PditTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": True,
                             "tooltip": "seed of the fake embedding"}),
            "tokens": ("INT", {"default": 12, "min": 1, "max": 512, "tooltip": "fake prompt length"}),
            "width": ("INT", {"default": 4096, "min": 1, "max": 8192, "tooltip": "embedding width (umt5: 4096)"}),
        }, "optional": {
            "masked_tail": ("INT", {"default": -1, "min": -1, "max": 512,
                                    "tooltip": "with an attention mask (as LTXV's T5 gives), its last n tokens "
                                               "padding; -1: no mask"}),
            "byt5_tokens": ("INT", {"default": 0, "min": 0, "max": 256,
                                    "tooltip": "HunyuanVideo 1.5's ByT5 glyph text (n tokens of 1472); 0: none"}),
            "pooled_width": ("INT", {"default": 0, "min": 0, "max": 4096,
                                     "tooltip": "a pooled vector of this width (HunyuanVideo 1.0's CLIP-L: 768); 0: "
                                                "None, as CLIPTextEncode gives for a text encoder without one"}),
            "ltxav_raw": ("BOOLEAN", {"default": False,
                                      "tooltip": "raw LTX-2 text, flagged as ComfyUI's LTX-2 text encoder flags it "
                                                 "(unprocessed_ltxav_embeds: the DiT's text connectors run)"}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, width, masked_tail=-1, byt5_tokens=0, pooled_width=0, ltxav_raw=False):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled_width, generator=g) if pooled_width else None}
        if ltxav_raw:
            extra["unprocessed_ltxav_embeds"] = True
        if masked_tail >= 0:
            extra["attention_mask"] = (torch.arange(tokens) < tokens - masked_tail).long().view(1, tokens)
        text = torch.randn(1, tokens, width, generator=g)
        if byt5_tokens:
            extra["conditioning_byt5small"] = torch.randn(1, byt5_tokens, 1472, generator=g)
        return ([[text, extra]],)


class _FakeWan22VAE:
    """Encodes like the Wan 2.2 VAE in shape only (48 channels, 16x spatial, 4x temporal compression):
    deterministic noise plus the image's mean, so Wan22ImageToVideoLatent runs its real code around it.
    channels=16, spatial=8: the Wan 2.1 VAE's shapes (Cosmos Predict2's CosmosPredict2ImageToVideoLatent); 128, 32,
    temporal 8: LTX-Video's and LTX-2's."""

    def __init__(self, seed, channels=48, spatial=16, temporal=4):
        self.seed, self.channels, self.spatial, self.temporal = seed, channels, spatial, temporal
        self.latent_channels = channels  # what ComfyUI's Wan nodes read from a VAE besides encode()
        self.downscale_index_formula = (temporal, spatial, spatial)  # what the LTX nodes read

    def spacial_compression_encode(self):
        return self.spatial

    def temporal_compression_encode(self):
        return self.temporal

    def encode(self, pixels):
        frames, height, width = pixels.shape[0], pixels.shape[1], pixels.shape[2]
        g = torch.Generator().manual_seed(self.seed)
        z = torch.randn(1, self.channels, (frames - 1) // self.temporal + 1, height // self.spatial,
                        width // self.spatial, generator=g)
        return z + pixels.float().mean()


class _FakeLTX2AudioVAE:
    """LTX-2's audio VAE in shape only (8 channels x 16 frequency bins), so LTXVEmptyLatentAudio runs its real code
    around it; about 6 latents per second (the release has 25: fewer keeps the test's audio stream short)."""
    latent_channels = 8

    def __init__(self):
        self.first_stage_model = self

    latent_frequency_bins = 16

    @staticmethod
    def num_of_latents_from_frames(frames_number, frame_rate):
        return max(1, math.ceil(frames_number / frame_rate * 6.25))

    audio_sample_rate = 16000  # the test's WAV rate: no resampling (the encode below is shape only)

    def encode(self, waveform):
        """(batch, samples, channels) -> the latent's shape for that duration: deterministic noise plus the sound's
        mean, as LTXVAudioVAEEncode / LTXVReferenceAudio use it."""
        seconds = waveform.shape[1] / self.audio_sample_rate
        g = torch.Generator().manual_seed(5)
        latents = max(1, math.ceil(seconds * 6.25))
        return torch.randn(waveform.shape[0], self.latent_channels, latents, self.latent_frequency_bins,
                           generator=g) + waveform.float().mean()


class _UnitLatentStatistics:
    """An LTX VAE's per-channel latent statistics at mean 0, std 1 (LTXVLatentUpsampler un-normalizes the latent
    with them before the upscale model and normalizes after)."""

    def __init__(self):
        self.per_channel_statistics = self

    @staticmethod
    def normalize(x):
        return x

    @staticmethod
    def un_normalize(x):
        return x


class PditTestVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                              "tooltip": "seed of the fake latent"})},
                "optional": {"kind": (["wan2.2", "wan2.1", "hunyuan_video_1.5", "ltx2-audio", "ltxv",
                                       "minimax_h3"], {"default": "wan2.2", "tooltip": "whose latent shape"})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, kind="wan2.2"):
        if kind == "ltx2-audio":
            return (_FakeLTX2AudioVAE(),)
        if kind == "minimax_h3":  # MiniMax H3's video VAE: 24 channels, 16x spatial, 4x temporal
            return (_FakeWan22VAE(seed, channels=24, spatial=16),)
        if kind == "ltxv":  # LTX-Video's and LTX-2's video VAE: 128 channels, 32x spatial, 8x temporal
            vae = _FakeWan22VAE(seed, channels=128, spatial=32, temporal=8)
            vae.first_stage_model = _UnitLatentStatistics()  # what LTXVLatentUpsampler reads
            return (vae,)
        channels, spatial = {"wan2.2": (48, 16), "wan2.1": (16, 8), "hunyuan_video_1.5": (32, 16)}[kind]
        return (_FakeWan22VAE(seed, channels=channels, spatial=spatial),)


def _native_cosmos(path, image_model, count_blocks, head_norm_key, num_blocks, num_heads):
    """ComfyUI's native BaseModel for a Cosmos file of any width: ComfyUI's detection sets every field but the depth
    and head count for widths other than the released ones (it fixes those from the width); they come from the
    arguments (the preset the file was written with), else from the state dict itself (`count_blocks(sd)`; width /
    the per-head q norm's width)."""
    import comfy.model_detection
    import comfy.utils

    sd = comfy.utils.load_torch_file(path)
    sd = comfy.utils.state_dict_prefix_replace(sd, {comfy.model_detection.unet_prefix_from_state_dict(sd): ""},
                                               filter_keys=True)
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    assert unet_config["image_model"] == image_model, unet_config
    if num_blocks is None:
        num_blocks = count_blocks(sd)
    if num_heads is None:
        num_heads = unet_config["model_channels"] // sd[head_norm_key].shape[0]
    unet_config.update(num_blocks=num_blocks, num_heads=num_heads)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model(sd, "")
    base.load_model_weights(sd, "")
    return base


def cosmos_predict2_native(path, num_blocks=None, num_heads=None):
    """ComfyUI's native CosmosPredict2 BaseModel (MiniTrainDIT) for a Predict2 file of any width (see _native_cosmos;
    ComfyUI knows the 2B / 14B widths)."""
    return _native_cosmos(path, "cosmos_predict2",
                          lambda sd: 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                          "blocks.0.self_attn.q_norm.weight", num_blocks, num_heads)


def cosmos1_native(path, num_blocks=None, num_heads=None):
    """ComfyUI's native CosmosVideo BaseModel (GeneralDIT) for a Cosmos 1.0 file of any width (see _native_cosmos;
    ComfyUI fixes 36 x 40 for any width but 7B's 4096)."""
    return _native_cosmos(path, "cosmos",
                          lambda sd: 1 + max(int(k.split(".")[1][len("block"):]) for k in sd
                                             if k.startswith("blocks.block")),
                          "blocks.block0.blocks.0.block.attn.to_q.1.weight", num_blocks, num_heads)


class _NativeCosmosLoader:
    """ComfyUI's own Cosmos model (KSampler-ready ModelPatcher) for a tiny file, which the native Load Diffusion Model
    cannot size (its detection fixes the depth and heads from the width): a workflow test's parity oracle."""
    FAMILY = ""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),
                                           {"tooltip": f"a {cls.FAMILY} file"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    @staticmethod
    def native(path):
        raise NotImplementedError

    def load(self, unet_name):
        import comfy.model_management
        import comfy.model_patcher
        import folder_paths

        base = self.native(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        return (comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                                 offload_device=comfy.model_management.unet_offload_device()),)


class PditTestCosmosPredict2Loader(_NativeCosmosLoader):
    """ComfyUI's Cosmos Predict2 (MiniTrainDIT): the oracle of the Cosmos Predict2 workflow test."""
    FAMILY = "Cosmos Predict2"
    native = staticmethod(lambda path: cosmos_predict2_native(path))


class PditTestCosmos1Loader(_NativeCosmosLoader):
    """ComfyUI's Cosmos 1.0 (GeneralDIT): the oracle of the Cosmos 1 workflow test."""
    FAMILY = "Cosmos 1.0"
    native = staticmethod(lambda path: cosmos1_native(path))


class PditTestClipVision:
    """Stand-in for CLIPVisionEncode with clip_vision_h (257 penultimate tokens of width 1280) or with SigLIP 384
    (sigclip_vision_patch14_384: 729 last hidden states of width 1152, what HunyuanVideo 1.5 I2V reads)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                              "tooltip": "seed of the fake CLIP vision tokens"})},
                "optional": {"kind": (["clip_vision_h", "siglip_384"], {"default": "clip_vision_h"})}}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, kind="clip_vision_h"):
        import types
        g = torch.Generator().manual_seed(seed)
        if kind == "siglip_384":
            return (types.SimpleNamespace(last_hidden_state=torch.randn(1, 729, 1152, generator=g)),)
        return (types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g)),)


class PditTestAudioEncoding:
    """Stand-in for AudioEncoderLoader + AudioEncoderEncode (wav2vec2 files are detected only at full size: 95 M /
    315 M parameters): the encoder output's shapes for the given audio (50 frames a second of 16 kHz audio, one
    hidden state per layer plus the input's), deterministic values plus the audio's mean."""
    SIZES = {"wav2vec2_large": (1024, 24), "wav2vec2_base": (768, 12)}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": ("AUDIO",),
                             "kind": (list(cls.SIZES), {"default": "wav2vec2_large", "tooltip": "whose shapes"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("AUDIO_ENCODER_OUTPUT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, audio, kind, seed):
        width, layers = self.SIZES[kind]
        samples = round(audio["waveform"].shape[-1] * 16000 / audio["sample_rate"])
        frames = max(1, (samples - 400) // 320 + 1)  # the wav2vec2 feature extractor's receptive field and stride
        g = torch.Generator().manual_seed(seed)
        offset = audio["waveform"].float().mean()
        all_layers = tuple(torch.randn(1, frames, width, generator=g) + offset for _ in range(layers + 1))
        return ({"encoded_audio": all_layers[-1], "encoded_audio_all_layers": all_layers, "audio_samples": samples},)


def _boxes(n, height, width, objects, frame_shift=0):
    """`objects` deterministic rectangles side by side on each of n frames (moving right by frame_shift a frame)."""
    masks = torch.zeros(n, objects, height, width)
    for t in range(n):
        for i in range(objects):
            x0 = (i * width // objects + t * frame_shift) % width
            masks[t, i, height // 4: 3 * height // 4, x0: min(width, x0 + width // (2 * objects) + 1)] = 1
    return masks


class PditTestSAM3Detect:
    """Stand-in for SAM3_Detect (its checkpoint, SAM 3.1, is 1.7 GB): one rectangle per frame as the mask."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("MASK", "BOUNDING_BOX")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, image):
        n, h, w = image.shape[0], image.shape[1], image.shape[2]
        masks = _boxes(n, h, w, 1)[:, 0]
        return (masks, [[{"x": w // 4, "y": h // 4, "width": w // 2, "height": h // 2}] for _ in range(n)])


class PditTestSAM3Track:
    """Stand-in for SAM3_VideoTrack: `max_objects` tracked rectangles (at most 2), moving across the frames, in the
    track data layout ComfyUI's SAM3 tracker returns (bit-packed masks, orig_size)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "max_objects": ("INT", {"default": 2, "min": 1, "max": 64})}}

    RETURN_TYPES = ("SAM3_TRACK_DATA",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, images, max_objects):
        from comfy.ldm.sam3.tracker import pack_masks
        n, h, w = images.shape[0], images.shape[1], images.shape[2]
        objects = min(max_objects, 2)
        masks = _boxes(n, h, (w + 7) // 8 * 8, objects, frame_shift=2)
        return ({"packed_masks": pack_masks(masks), "scores": [0.9] * objects, "n_frames": n, "orig_size": (h, w)},)


class _FakeTextEncoder:
    """A text encoder in shape only, for nodes that take the CLIP itself (MiniMaxH3ImageToVideo tokenizes the prompt
    with its keyframe images and encodes): 12 tokens of `width` per prompt, seeded by the prompt's text."""

    def __init__(self, width):
        self.width = width

    def tokenize(self, text, images=None, **_kwargs):
        return {"seed": sum(map(ord, text)) % 2**31, "images": len(images or [])}

    def encode_from_tokens_scheduled(self, tokens, **_kwargs):
        g = torch.Generator().manual_seed(tokens["seed"])
        return [[torch.randn(1, 12, self.width, generator=g), {"pooled_output": None}]]


class PditTestTextEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 96, "min": 1, "max": 8192,
                                               "tooltip": "the encoder's hidden width (the tiny MiniMax H3: 96)"})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, width):
        return (_FakeTextEncoder(width),)


class PditTestSaveImage:
    """Saves an IMAGE as the float tensor it is (output/<prefix>_<n>.image.safetensors): a decode compared exactly,
    not through an 8-bit PNG."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "the decoded frames"}),
                             "filename_prefix": ("STRING", {"default": "images/test", "tooltip": "under output/"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, images, filename_prefix):
        import os

        import folder_paths
        from safetensors.torch import save_file
        base = os.path.join(folder_paths.get_output_directory(), filename_prefix)
        os.makedirs(os.path.dirname(base), exist_ok=True)
        n = 1
        while os.path.exists(f"{base}_{n:05}.image.safetensors"):
            n += 1
        save_file({"image": images.float().contiguous().cpu()}, f"{base}_{n:05}.image.safetensors")
        return {}


NODE_CLASS_MAPPINGS = {"PditTestConditioning": PditTestConditioning, "PditTestVAE": PditTestVAE,
                       "PditTestTextEncoder": PditTestTextEncoder,
                       "PditTestClipVision": PditTestClipVision,
                       "PditTestCosmosPredict2Loader": PditTestCosmosPredict2Loader,
                       "PditTestCosmos1Loader": PditTestCosmos1Loader, "PditTestAudioEncoding": PditTestAudioEncoding,
                       "PditTestSAM3Detect": PditTestSAM3Detect, "PditTestSAM3Track": PditTestSAM3Track,
                       "PditTestSaveImage": PditTestSaveImage}
