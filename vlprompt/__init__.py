"""Prompt learning on frozen CLIP, framework-free (torch and clip only)."""
import warnings

# The clip package imports pkg_resources, whose deprecation warning would open every command's output.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
