"""data_prep: raw Japanese text (mC4, Wikipedia, local files, Aozora) to clean, deduplicated documents."""
