"""Operations on a dataset's columns: deduplication, classifiers, CLIP score and threshold filters."""
