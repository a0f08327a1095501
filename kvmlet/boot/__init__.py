"""Guest boot: kernel images and boot protocols."""
