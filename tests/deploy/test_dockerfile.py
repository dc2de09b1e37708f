"""The Dockerfile's promises, read statically (no container engine here to build it)."""

from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "Dockerfile"


def stages() -> list[list[str]]:
    found: list[list[str]] = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("FROM "):
            found.append([])
        if found and line.strip() and not line.startswith("#"):
            found[-1].append(line.strip())
    return found


def test_it_is_multi_stage_and_slim() -> None:
    built = stages()
    assert len(built) == 2
    assert all(stage[0].startswith("FROM python:3.11-slim") for stage in built)


def test_the_final_image_runs_as_a_non_root_user_without_build_steps() -> None:
    final = stages()[-1]
    assert "USER 10001" in final
    assert not [line for line in final if line.startswith("RUN pip") or "apt-get" in line]
    assert any(line.startswith("COPY --from=build /opt/venv") for line in final)
    assert 'ENTRYPOINT ["switchboard"]' in final


def test_it_installs_the_pinned_lock_file() -> None:
    assert "pip install --no-cache-dir -r requirements.lock" in " ".join(stages()[0])
