"""Server and CLI settings, from `PICTOPROMPT_*` environment variables and command-line flags."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _xdg(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / fallback) / "pictoprompt"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PICTOPROMPT_", extra="ignore")

    profile: str | None = Field(None, description="Model profile; default `shapes` (bundled), else `tiny`.")
    profiles_file: Path | None = Field(None, description="A TOML file with extra [profiles.NAME] tables.")
    cache_dir: Path = Field(default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache"))
    data_dir: Path = Field(default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share"))
    asset_dir: Path | None = Field(None, description="Where output images go; default <cache_dir>/assets.")
    asset_ttl_seconds: float = Field(7 * 24 * 3600, gt=0)
    asset_max_bytes: int = Field(2 * 1024**3, gt=0)
    queue_depth: int = Field(8, ge=1, le=1000)
    allow_dirs: list[Path] = Field(default_factory=list)
    allow_home: bool = Field(True, description="Allow local paths under the home directory (stdio only).")
    allow_private_urls: bool = False
    token: str | None = Field(None, description="Bearer token required on HTTP; set PICTOPROMPT_TOKEN.")
    ray: bool = Field(False, description="Hand the model work to a Ray Serve deployment (`serve --http --ray`).")
    ray_address: str | None = Field(None, description="An existing Ray cluster; default: start a local Ray.")
    ray_min_replicas: int = Field(1, ge=0, description="Fewest replicas, each holding one runtime.")
    ray_max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler may start.")
    ray_target_ongoing_requests: float = Field(1.0, gt=0, description="Requests per replica the autoscaler aims at.")
    ray_replica_cpus: float = Field(1.0, gt=0, description="CPUs per replica (also its torch threads on a CPU).")
    ray_replica_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica; default 1 when the cluster has GPUs, else 0."
    )
    ray_batch_size: int = Field(
        8,
        ge=1,
        le=64,
        description="Most concurrent generate_image/vary_image calls a replica samples in one U-Net batch (they must "
        "share step count and size); 1 runs one call at a time.",
    )
    ray_batch_wait_seconds: float = Field(
        0.05,
        ge=0,
        le=5,
        description="How long a replica waits for more calls to fill a batch; a call alone never waits.",
    )

    @property
    def assets_root(self) -> Path:
        return self.asset_dir or self.cache_dir / "assets"
