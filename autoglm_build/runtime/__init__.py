"""Running a build: backends over graphs/engines, prompts, media, and batched generation."""
