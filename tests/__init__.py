"""Tests for kvmlet."""
