"""Test-session setup: the allocator setting launch.py applies (it changes no number; it saves the page faults
of the many large short-lived tensors, see lm_human_preferences/utils/alloc.py)."""
from lm_human_preferences.utils.alloc import keep_freed_memory

keep_freed_memory()
