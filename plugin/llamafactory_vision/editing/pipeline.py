"""Inference: ``EditPipeline(image, instruction)`` -> the edited image and the MLLM's expressive instruction.

A diffusers ``DiffusionPipeline`` (``save_pretrained``/``from_pretrained``, progress bar, ``generator``) laid out like
``StableDiffusionInstructPix2PixPipeline``; its condition comes from the MLLM's ``[IMG]`` hidden states through the
edit head instead of CLIP text. :meth:`EditPipeline.from_training` builds one from a training run's output (base
model + adapter, or a fully fine-tuned model) through the host's loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import ImageOps
from transformers import PreTrainedModel, ProcessorMixin

from llamafactory_vision.editing.edit_head import EditHead
from llamafactory_vision.editing.parts import HEAD_DIR, UNET_DIR, EditRecord, parts_dir
from llamafactory_vision.editing.tokens import IMG_TOKENS, PROMPT, img_token_ids, with_img_tokens


@dataclass
class EditPipelineOutput(BaseOutput):
    """images: the edited images (``PIL.Image`` list, or ``Tensor[B, 3, H, W]`` in [0, 1] with ``output_type="pt"``);
    expressive: the expressive instruction the MLLM wrote for each."""

    images: list[PIL.Image.Image] | torch.Tensor
    expressive: list[str]


class EditPipeline(DiffusionPipeline):
    """Args:
    mllm (PreTrainedModel): LLaVA v1.5 with the [IMG] tokens (adapters merged).
    processor (ProcessorMixin): its processor; the tokenizer holds ``[IMG0]``..``[IMG7]``.
    edit_head (EditHead): [IMG] hidden states -> UNet condition.
    unet (UNet2DConditionModel): 8 input channels (noisy latent + source latent).
    vae (AutoencoderKL), scheduler (any diffusers scheduler; Euler ancestral as InstructPix2Pix by default).
    template (str, default "llava_edit"): the LLaMA-Factory template the MLLM was trained with.
    """

    model_cpu_offload_seq = "mllm->edit_head->unet->vae"

    def __init__(
        self,
        mllm: PreTrainedModel,
        processor: ProcessorMixin,
        edit_head: EditHead,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: EulerAncestralDiscreteScheduler,
        template: str = "llava_edit",
    ):
        super().__init__()
        self.register_modules(
            mllm=mllm, processor=processor, edit_head=edit_head, unet=unet, vae=vae, scheduler=scheduler
        )
        self.register_to_config(template=template)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_training(
        cls,
        model_name_or_path: str,
        adapter_name_or_path: str | None = None,
        diffusion_model_name_or_path: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
    ) -> EditPipeline:
        """Build the pipeline from a training run: the base model + LoRA adapter (merged by the host's loader), or a
        fully fine-tuned model; the edit head and UNet from beside it; the VAE and scheduler from the diffusion
        folder recorded at training time (``edit_config.json``) unless ``diffusion_model_name_or_path`` is given."""
        from llamafactory.hparams import FinetuningArguments, ModelArguments
        from llamafactory.model import load_model, load_tokenizer

        model_args = ModelArguments(
            model_name_or_path=model_name_or_path, adapter_name_or_path=adapter_name_or_path, infer_dtype="float32"
        )
        trained = parts_dir(model_args)
        EditRecord.load(trained)  # not an edit run's output: say so before loading the model
        model_args = with_img_tokens(model_args)
        tokenizer_module = load_tokenizer(model_args)
        finetuning_args = FinetuningArguments(finetuning_type="lora" if adapter_name_or_path else "full")
        mllm = load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=False)
        return cls.from_mllm(
            mllm.to(torch_dtype), tokenizer_module["processor"], trained, diffusion_model_name_or_path
        )

    @classmethod
    def from_mllm(
        cls,
        mllm: PreTrainedModel,
        processor: ProcessorMixin,
        trained_dir: str | Path,
        diffusion_model_name_or_path: str | None = None,
    ) -> EditPipeline:
        """Build the pipeline around an MLLM already loaded with its [IMG] tokens (e.g. by LLaMA-Board's chat
        engine): the edit head and UNet from ``trained_dir`` (an edit run's output), in the MLLM's dtype and on its
        device; the VAE and scheduler from the diffusion folder recorded there unless ``diffusion_model_name_or_path``
        is given."""
        trained = Path(trained_dir)
        record = EditRecord.load(trained)
        diffusion = Path(diffusion_model_name_or_path or record.diffusion_model_name_or_path)
        dtype, device = mllm.dtype, mllm.device
        return cls(
            mllm=mllm,
            processor=processor,
            edit_head=EditHead.from_pretrained(trained / HEAD_DIR, torch_dtype=dtype).to(device),
            unet=UNet2DConditionModel.from_pretrained(trained / UNET_DIR, torch_dtype=dtype).to(device),
            vae=AutoencoderKL.from_pretrained(diffusion / "vae", torch_dtype=dtype).to(device),
            scheduler=EulerAncestralDiscreteScheduler.from_pretrained(diffusion / "scheduler"),
            template=record.template,
        )

    # 0. Check inputs
    def check_inputs(self, image, instruction, num_inference_steps, text_guidance_scale, image_guidance_scale):
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"`image` must be a PIL.Image, got {type(image).__name__}.")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"`instruction` must be a non-empty string, got {instruction!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        for name, value in (("text_guidance_scale", text_guidance_scale), ("image_guidance_scale", image_guidance_scale)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1 (1 = no guidance), got {value}.")

    # 1. The MLLM prompt, built by the LLaMA-Factory template the model was trained with
    def encode_prompt(self, image: PIL.Image.Image, instruction: str) -> dict[str, torch.Tensor]:
        from llamafactory.data.template import TEMPLATES
        from llamafactory.extras.constants import IMAGE_PLACEHOLDER

        template = TEMPLATES[self.config.template]
        messages = [
            {"role": "user", "content": IMAGE_PLACEHOLDER + PROMPT.format(instruction=instruction)},
            {"role": "assistant", "content": ""},
        ]
        messages = template.mm_plugin.process_messages(messages, [image], [], [], self.processor)
        prompt_ids, _ = template.encode_oneturn(self.processor.tokenizer, messages)
        mm_inputs = template.mm_plugin.get_mm_inputs([image], [], [], [1], [0], [0], [prompt_ids], self.processor)
        inputs = {k: v.to(self.mllm.device) for k, v in mm_inputs.items() if isinstance(v, torch.Tensor)}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.mllm.dtype)
        inputs["input_ids"] = torch.tensor([prompt_ids], device=self.mllm.device)
        return inputs

    # 2. The expressive instruction: greedy decoding, stopped at EOS or at the first [IMG] token
    def generate_expressive(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        tokenizer = self.processor.tokenizer
        stop = [tokenizer.eos_token_id, img_token_ids(tokenizer)[0]]
        out = self.mllm.generate(
            **inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        new = out[0, inputs["input_ids"].size(1) :].tolist()
        cut = next((i for i, t in enumerate(new) if t in stop), len(new))
        return torch.tensor(new[:cut], dtype=torch.long, device=self.mllm.device)

    # 3. The [IMG] hidden states: the 8 tokens appended to the text, one forward pass (the state before each [IMGk])
    def img_hidden_states(self, inputs: dict[str, torch.Tensor], text_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        img_ids = torch.tensor(img_token_ids(self.processor.tokenizer), device=self.mllm.device)
        full = torch.cat([inputs["input_ids"][0], text_ids, img_ids])[None]
        hidden = self.mllm(
            **{**inputs, "input_ids": full}, attention_mask=torch.ones_like(full), output_hidden_states=True
        ).hidden_states[-1]
        start = full.size(1) - len(IMG_TOKENS) - 1
        embeds = self.mllm.get_input_embeddings()(img_ids)[None]
        return hidden[:, start : start + len(IMG_TOKENS)], embeds

    # 5. The source image latent (posterior mode, unscaled, as InstructPix2Pix)
    def prepare_image_latents(self, image: torch.Tensor) -> torch.Tensor:
        image = image.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.encode(image).latent_dist.mode()

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image,
        instruction: str,
        num_inference_steps: int = 100,
        text_guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        resolution: int | None = None,
        max_new_tokens: int = 96,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        expressive: str | None = None,
    ) -> EditPipelineOutput:
        """Args:
        image (PIL.Image): the source image; resized to a multiple of 8 (or covered and centre-cropped to
            ``resolution`` x ``resolution`` when given, as in training).
        instruction (str): the edit, e.g. "make it snowy".
        num_inference_steps (int, default 100), text_guidance_scale (float, default 7.5), image_guidance_scale
            (float, default 1.5): as InstructPix2Pix (MGIE's values).
        max_new_tokens (int, default 96): longest expressive instruction.
        generator (torch.Generator, optional): the same generator state gives the same image.
        output_type (str, default "pil"): "pil", "np" or "pt".
        expressive (str, optional): an expressive instruction this MLLM already wrote for ``image`` and
            ``instruction`` (a chat answer); used instead of generating one in step 2.
        """
        # 0. Check inputs
        self.check_inputs(image, instruction, num_inference_steps, text_guidance_scale, image_guidance_scale)
        image = image.convert("RGB")
        if resolution is not None:
            image = ImageOps.fit(image, (resolution, resolution), method=PIL.Image.Resampling.BICUBIC)
        # 1. Encode the MLLM prompt
        inputs = self.encode_prompt(image, instruction)
        # 2. Generate the expressive instruction (or tokenize the given one)
        if expressive is None:
            text_ids = self.generate_expressive(inputs, max_new_tokens)
            expressive = self.processor.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        else:
            expressive = expressive.strip()
            given = self.processor.tokenizer.encode(expressive, add_special_tokens=False)
            text_ids = torch.tensor(given, dtype=torch.long, device=self.mllm.device)
        # 3. Read the [IMG] hidden states
        img_hidden, img_embeds = self.img_hidden_states(inputs, text_ids)
        # 4. Edit head: condition, null condition; order [text+image, image only, neither] as InstructPix2Pix
        head_dtype = self.edit_head.dtype
        condition = self.edit_head(img_hidden.to(head_dtype), img_embeds.to(head_dtype))
        null = self.edit_head.null_condition(img_embeds.to(head_dtype))
        prompt_embeds = torch.cat([condition, null, null]).to(self.unet.dtype)
        # 5. Preprocess the image and encode its latent
        pixels = self.image_processor.preprocess(image)
        image_latents = self.prepare_image_latents(pixels)
        image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        # 6. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=self.unet.device)
        timesteps = self.scheduler.timesteps
        # 7. Initial latents
        shape = (1, self.vae.config.latent_channels, *image_latents.shape[-2:])
        latents = randn_tensor(shape, generator=generator, device=self.unet.device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        # 8. Denoising loop with text and image guidance
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for t in timesteps:
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * 3), t)
                model_input = torch.cat([model_input, image_latents.to(model_input.dtype)], dim=1)
                noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds).sample
                text, image_only, uncond = noise_pred.chunk(3)
                noise_pred = (
                    uncond + text_guidance_scale * (text - image_only) + image_guidance_scale * (image_only - uncond)
                )
                latents = self.scheduler.step(noise_pred, t, latents, generator=generator).prev_sample
                progress_bar.update()
        # 9. Decode
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return EditPipelineOutput(images=images, expressive=[expressive])
